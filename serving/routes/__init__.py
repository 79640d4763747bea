"""The service's routes, one module per group; ``serving.app.create_app`` includes them."""
