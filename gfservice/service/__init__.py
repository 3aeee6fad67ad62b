"""The aggregator core (plain Python: no Ray, no torch), the Ray actor around it and the client."""
