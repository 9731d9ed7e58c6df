-- POST with the API key from $API_KEY (the repeated, idempotent end).
wrk.method = "POST"
wrk.headers["x-api-key"] = os.getenv("API_KEY")
