module livepipe/bench/loadgen

go 1.26
