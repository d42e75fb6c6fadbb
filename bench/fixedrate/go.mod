module github.com/driftlock/gateway/bench/fixedrate

go 1.19
