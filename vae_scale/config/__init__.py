"""The run config: one schema (a row per field: type, choices, bounds, what a change at resume means),
validation, and (de)serialisation of a config stored with a checkpoint."""
