"""Pictures of a trained CAL: `figures` chooses what to draw, `plots` draws arrays."""
