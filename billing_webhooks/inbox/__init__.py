"""The Stripe inbox: verify, store and apply Stripe's events, and repair from Stripe's API."""
