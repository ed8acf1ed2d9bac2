"""Moving weights in and out of moge: other checkpoint layouts, and dense-to-MoGE upcycling."""
