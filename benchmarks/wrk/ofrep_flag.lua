-- POST /ofrep/v1/evaluate/flags/{key} with the same context every time (as post_identity.lua: cached).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"context":{"targetingKey":"do_it_all_in_one_go_identity","age":30,"beta":true}}'
