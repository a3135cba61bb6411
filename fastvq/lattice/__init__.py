"""Lattice codebooks: the Golay code, the Leech lattice shell (196,560 codes) and E8."""
