module kiln/gorender

go 1.19
