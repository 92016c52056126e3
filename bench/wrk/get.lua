-- GET with the key from the API_KEY environment variable (for /query).
local key = os.getenv("API_KEY")
if key then
  wrk.headers["X-API-Key"] = key
end
