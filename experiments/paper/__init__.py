"""What the paper says: its claims in its own words (and the claims we add beyond it), the
verdict format, and its numbers for the report's side-by-side columns."""
