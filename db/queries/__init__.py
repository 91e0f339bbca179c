"""Every SQL statement the project runs, grouped by domain; functions take an asyncpg connection or pool."""
