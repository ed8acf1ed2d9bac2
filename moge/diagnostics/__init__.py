"""Looking inside the router: collapse warnings during training, expert knock-out after it."""
