"""Client libraries for the platform's public APIs."""
