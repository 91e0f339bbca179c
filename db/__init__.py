"""Data layer: migrations, every SQL statement the project runs, the demo-data generator."""
