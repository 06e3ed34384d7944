"""The only package that imports bcc: the real ProgramLoader over Debian's python3-bpfcc."""
