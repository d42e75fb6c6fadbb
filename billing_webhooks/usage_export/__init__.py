"""The usage export: counted units reported to Stripe Billing Meters, exactly once."""
