"""Where background tasks run (in this process or in arq workers), and the upkeep of the table."""
