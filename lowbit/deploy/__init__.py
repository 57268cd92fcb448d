"""Running quantized models: text generation (:mod:`.generate`) and speed/memory benchmarks (:mod:`.bench`)."""
