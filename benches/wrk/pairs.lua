-- Create a session, then end it, over and over: each connection alternates.
wrk.headers["x-api-key"] = os.getenv("API_KEY")
local pending = {}

request = function()
  local id = table.remove(pending)
  if id then
    return wrk.format("POST", "/v1/sessions/" .. id .. "/end")
  end
  return wrk.format("POST", "/v1/sessions")
end

response = function(status, headers, body)
  if status == 201 then
    local id = body:match('"session_id":"(sess_[0-9A-Z]+)"')
    if id then table.insert(pending, id) end
  end
end
