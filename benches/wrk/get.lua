-- GET with the API key from $API_KEY.
wrk.headers["x-api-key"] = os.getenv("API_KEY")
