"""Tools that read a config and say what a run would take (moge plan)."""
