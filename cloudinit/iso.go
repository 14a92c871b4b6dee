package cloudinit

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kdomanski/iso9660"

	"github.com/otherix/otherix-agent/internal/atomicfile"
	"github.com/otherix/otherix-agent/internal/errcode"
)

// VolumeLabel is the volume identifier NoCloud looks for. cloud-init
// accepts "cidata" and, since 2019, "CIDATA"; lower case works with all.
const VolumeLabel = "cidata"

// The seed's file names. kdomanski/iso9660 records them as ISO9660
// identifiers with a version suffix ("meta-data;1"): lower case and '-'
// kept as given, which is not strict ISO9660 d-characters but what Linux
// isofs expects; with its default map=normal it shows them as "meta-data".
const (
	fileMetaData      = "meta-data"
	fileUserData      = "user-data"
	fileNetworkConfig = "network-config"
	fileVendorData    = "vendor-data"
)

type seedFile struct {
	name string
	data []byte
}

// files lists the seed's files in a fixed order.
func (s Seed) files() []seedFile {
	files := []seedFile{{fileMetaData, s.MetaData()}}
	for _, f := range []seedFile{
		{fileUserData, s.UserData},
		{fileNetworkConfig, s.NetworkConfig},
		{fileVendorData, s.VendorData},
	} {
		if f.data != nil {
			files = append(files, f)
		}
	}
	return files
}

// Build writes the seed's ISO image to w. The same Seed always gives the
// same bytes.
//
// Build checks instance-id and hostname, which go into meta-data, but
// writes user-data, network-config and vendor-data as given: call
// Validate first. The image is assembled in memory (a seed is small);
// kdomanski/iso9660 stages the files in a private (0700) directory under
// os.TempDir() while it writes, and that directory is removed before Build
// returns.
func Build(w io.Writer, s Seed) error {
	img, err := s.image()
	if err != nil {
		return err
	}
	if _, err := w.Write(img); err != nil {
		return ioError(err, "write seed iso")
	}
	return nil
}

// WriteISO writes the seed's ISO image to path, atomically: the image goes
// to a temporary file in the same directory, mode 0600, which is synced and
// then renamed over path, and the directory is synced. On error nothing is
// left behind and an existing file at path is untouched. Like Build, it
// expects a validated Seed.
func WriteISO(path string, s Seed) (err error) {
	img, err := s.image()
	if err != nil {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return ioError(err, "create seed iso")
	}
	tmp := f.Name()
	closed := false
	defer func() {
		if err != nil {
			if !closed {
				f.Close()
			}
			os.Remove(tmp)
		}
	}()
	// CreateTemp already uses 0600; say so explicitly, whatever the umask.
	if err = f.Chmod(0o600); err != nil {
		return ioError(err, "create seed iso")
	}
	if _, err = f.Write(img); err != nil {
		return ioError(err, "write seed iso")
	}
	if err = f.Sync(); err != nil {
		return ioError(err, "write seed iso")
	}
	closed = true
	if err = f.Close(); err != nil {
		return ioError(err, "write seed iso")
	}
	if err = os.Rename(tmp, path); err != nil {
		return ioError(err, "write seed iso")
	}
	if err = syncDir(dir); err != nil {
		// The file is in place; only its durability is in doubt.
		return ioError(err, "sync seed iso directory")
	}
	return nil
}

func syncDir(dir string) error { return atomicfile.SyncDir(dir) }

// ioError gives a file system error its code: disk_full when the disk is
// full, internal otherwise.
func ioError(err error, what string) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errcode.Wrap(errcode.DiskFull, err, "%s", what)
	}
	return errcode.Wrap(errcode.Internal, err, "%s", what)
}

// image returns the finished ISO image.
func (s Seed) image() ([]byte, error) {
	if err := s.validateIdentity(); err != nil {
		return nil, err
	}
	iw, err := iso9660.NewWriter()
	if err != nil {
		return nil, ioError(err, "build seed iso: create staging directory")
	}
	var buf bytes.Buffer
	err = stage(iw, s, &buf)
	// The staging directory holds user-data: not removing it is an error
	// even when the image was written.
	if cerr := iw.Cleanup(); err == nil && cerr != nil {
		err = ioError(cerr, "build seed iso: remove staging directory")
	}
	if err != nil {
		return nil, err
	}
	img, err := normalize(buf.Bytes())
	if err != nil {
		return nil, errcode.Wrap(errcode.Internal, err, "build seed iso")
	}
	return img, nil
}

func stage(iw *iso9660.ImageWriter, s Seed, w io.Writer) error {
	for _, f := range s.files() {
		if err := iw.AddFile(bytes.NewReader(f.data), f.name); err != nil {
			return ioError(err, "build seed iso: stage "+f.name)
		}
	}
	if err := iw.WriteTo(w, VolumeLabel); err != nil {
		return ioError(err, "build seed iso")
	}
	return nil
}
