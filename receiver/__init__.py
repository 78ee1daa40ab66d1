"""DICOM receiver: C-ECHO and C-STORE SCP writing into the incoming spool."""
