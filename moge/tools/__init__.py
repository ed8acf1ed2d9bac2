"""Tools that read models and runs from outside: fingerprints, simulation, planning."""
