"""QuIP# building blocks: randomized Hadamard incoherence (``hadamard``) and the E8P lattice codebook (``e8p``)."""
