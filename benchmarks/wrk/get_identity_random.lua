-- GET /api/v1/identities/?identifier=<random>: every request misses the response cache.
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/api/v1/identities/?identifier=user-" .. math.random(1, 100000000))
end
