"""Studies built on the toolkit; each is a function returning a result object."""
