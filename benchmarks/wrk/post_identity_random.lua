-- POST /api/v1/identities/ with a random identifier and 3 traits: every request is evaluated.
math.randomseed(os.time())
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = '{"identifier":"user-' .. math.random(1, 100000000) ..
    '","traits":[{"trait_key":"plan","trait_value":"premium"},{"trait_key":"age","trait_value":30},' ..
    '{"trait_key":"country","trait_value":"GB"}]}'
  return wrk.format(nil, nil, nil, body)
end
