"""What the API, the workers and the CLI share: settings, embedded servers, logging, the operator CLI."""
