"""Lightning strategies for composites' own parallelism (mixins written once; concrete classes per package)."""
