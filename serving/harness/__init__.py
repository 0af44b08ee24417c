"""Developer harnesses, run from a checkout and not shipped in the wheel: the benchmarks
(``tierpick bench``) and the real Envoy and LiteLLM proxy processes the end-to-end tests and
benchmarks start. The runtime package never imports them."""
