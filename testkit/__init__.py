"""What the tests and the benchmarks both build: tiny random-weight models of the real transformers classes, and a
local file server standing in for image hosts."""
