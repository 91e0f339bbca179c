"""The foundation every other layer builds on: settings, connections, embedded servers, logging, authorization.
It imports nothing else of the project."""
