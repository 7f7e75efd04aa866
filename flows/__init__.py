"""Prefect flows and the elmo-news command line."""
