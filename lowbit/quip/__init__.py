"""QuIP#'s solver-side building blocks: seeded RHT signs and rotations (``hadamard``), exact E8P encoding
(``e8p``, ``lattice``).  What inference needs to decode a QuIP# weight lives in :mod:`lowbit.packed`
(``rht``: the transforms; ``codebooks``: the E8P and E8 residual tables)."""
