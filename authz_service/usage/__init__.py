"""The usage ledger: counting billable units, flushing and spilling them, refunds and alerts."""
