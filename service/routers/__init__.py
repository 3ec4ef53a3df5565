"""The service's routes, one router per concern: tokens, compression, models, health and metrics."""
