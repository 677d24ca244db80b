"""The vocabulary every layer shares: records, operation ids, batch specs. Imports nothing else of ours."""
