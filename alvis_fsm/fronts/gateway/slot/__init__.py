"""A catalog model's place in the gateway: its slot, the sessions it makes, what they report."""
