-- POST /api/v1/identities/ with the same body every time (the Python proxy's load-test body shape).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"identifier":"do_it_all_in_one_go_identity","traits":[{"trait_key":"age","trait_value":30},{"trait_key":"beta","trait_value":true}]}'
