"""Reading finished or running executions: operation tree, history, timeline, HTML report."""
