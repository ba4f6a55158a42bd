-- POST /ofrep/v1/evaluate/flags/{key} with a random targetingKey and 3 traits (as post_identity_random.lua:
-- every request is evaluated).
math.randomseed(os.time())
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = '{"context":{"targetingKey":"user-' .. math.random(1, 100000000) ..
    '","plan":"premium","age":30,"country":"GB"}}'
  return wrk.format(nil, nil, nil, body)
end
