"""The example domain: creating a user publishes `user_created` in the same transaction; a
refused login publishes `login_failed`."""
