"""The licforge command line and the end-to-end flows."""
