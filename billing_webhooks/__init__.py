"""The Stripe webhook service that keeps billing state."""
