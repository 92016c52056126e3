-- POST /task with a fixed prompt; the key comes from the API_KEY environment variable.
wrk.method = "POST"
wrk.body = '{"prompt": "What is the capital of France?"}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("API_KEY")
if key then
  wrk.headers["X-API-Key"] = key
  wrk.headers["Authorization"] = "Bearer " .. key
end
