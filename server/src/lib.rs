//! The `zerotouch` library half of the server: configuration, serve, admin commands.
