-- wrk builds its request from a Lua table of -H fields, whose order is not the
-- command line's (and may change from one run to the next). Clients such as curl and
-- browsers send Host first; the gateway relays such a head as it came and rewrites
-- any other, so a row whose request has extra fields (gateway-session's Cookie) would
-- measure a random mix of both. This builds the request once, Host first, then the
-- other fields sorted by name.
wrk.format = function(method, path, headers, body)
  method = method or wrk.method
  path = path or wrk.path
  headers = headers or wrk.headers
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: " .. headers["Host"] }
  local names = {}
  for name in pairs(headers) do
    if name ~= "Host" then
      names[#names + 1] = name
    end
  end
  table.sort(names)
  for _, name in ipairs(names) do
    lines[#lines + 1] = name .. ": " .. headers[name]
  end
  if body then
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = body or ""
  return table.concat(lines, "\r\n")
end
