module github.com/driftlock/gateway/go

go 1.19
