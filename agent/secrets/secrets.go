// Package secrets seals small secrets (VNC passwords) that the agent must
// keep across restarts, so they never stand in clear in its state files.
//
// A random 256-bit key lives in one root 0600 file; a sealed value is
// "v1:" + base64(nonce || AES-256-GCM ciphertext), bound to a purpose
// string (e.g. the VM's uuid) as additional data, so a sealed value moved
// to another VM does not open.
package secrets

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"
)

// Box seals and opens secrets with one key.
type Box struct{ aead cipher.AEAD }

// Open loads the key at path, creating it (0600) on first use.
func Open(path string) (*Box, error) {
	key, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return nil, fmt.Errorf("secrets: create key: %w", err)
		}
		if _, err := f.Write(key); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, fmt.Errorf("secrets: %w", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("secrets: key file %s must be 0600", path)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("secrets: key file %s is %d bytes, want 32", path, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &Box{aead: aead}, nil
}

// Seal encrypts plain for purpose.
func (b *Box) Seal(plain, purpose string) (string, error) {
	nonce := make([]byte, b.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	ct := b.aead.Seal(nonce, nonce, []byte(plain), []byte(purpose))
	return "v1:" + base64.StdEncoding.EncodeToString(ct), nil
}

// Open decrypts a sealed value for purpose.
func (b *Box) Open(sealed, purpose string) (string, error) {
	raw, ok := strings.CutPrefix(sealed, "v1:")
	if !ok {
		return "", errors.New("secrets: unknown seal version")
	}
	ct, err := base64.StdEncoding.DecodeString(raw)
	if err != nil || len(ct) < b.aead.NonceSize() {
		return "", errors.New("secrets: malformed sealed value")
	}
	n := b.aead.NonceSize()
	plain, err := b.aead.Open(nil, ct[:n], ct[n:], []byte(purpose))
	if err != nil {
		return "", errors.New("secrets: sealed value does not open (wrong key or purpose)")
	}
	return string(plain), nil
}
