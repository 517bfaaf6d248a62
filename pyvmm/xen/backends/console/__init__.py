"""The backend of the guest's primary PV console."""
