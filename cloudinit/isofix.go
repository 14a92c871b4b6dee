package cloudinit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// What kdomanski/iso9660 v0.4.0 writes, and what normalize changes.
//
// ImageWriter.WriteTo lays out: 16 zero sectors (system area), the primary
// volume descriptor (PVD) at sector 16, the terminator at 17, then the
// directories and file extents, breadth first, from sector 18. File
// identifiers are "name;1" (mangleFileName: lower-cased, characters
// outside its d1 set replaced by '_', '.' splits name and extension, at
// most 30 bytes in all); no Rock Ridge, no Joliet.
//
// It offers no hook for time or layout, and it leaves four things this
// package cannot use as they are:
//
//   - The PVD's creation, modification and effective dates are
//     time.Now(): two builds of one seed differ.
//   - Directory records carry the zero time.Time, which its encoding turns
//     into the year 2049 (byte(1-1900) = 149, plus 1900).
//   - There are no path tables (size 0, location 0), which ECMA-119
//     requires. Linux isofs does not read them, but other readers (Windows'
//     CD-ROM file system among them) may look directories up through the
//     path table.
//   - The system identifier is runtime.GOOS.
//
// So normalize rewrites the written image in place, at the fixed offsets
// ECMA-119 gives: the PVD dates become a fixed epoch (creation and
// modification) or "not specified" (expiration and effective), every
// directory record's date becomes the epoch, the system identifier becomes
// "LINUX", and type L and type M path tables are appended after the last
// extent, with the PVD's volume size and path table fields updated. It
// checks the layout it expects and fails rather than patch blindly, so a
// library upgrade that changes it is caught by the tests.

const (
	sectorSize = 2048
	pvdSector  = 16

	// Offsets within the PVD (ECMA-119 8.4).
	pvdSystemID     = 8
	pvdVolumeSize   = 80  // both-endian uint32
	pvdPathTabSize  = 132 // both-endian uint32
	pvdPathTabL     = 140 // little-endian uint32
	pvdPathTabOptL  = 144
	pvdPathTabM     = 148 // big-endian uint32
	pvdPathTabOptM  = 152
	pvdRootRecord   = 156 // 34-byte directory record
	pvdCreated      = 813 // 17-byte dec-datetime
	pvdModified     = 830
	pvdExpires      = 847
	pvdEffective    = 864
	recordDateOff   = 18 // 7-byte datetime within a directory record
	recordMinLength = 34
	dirFlag         = 0x02
)

// isoEpoch is the time stamped into every seed: the DOS/ZIP epoch that
// reproducible-build tools use. Nothing in the guest reads it; blkid
// derives the volume's UUID from the PVD dates, so every seed shows
// UUID="1980-01-01-00-00-00-00".
var isoEpoch = time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)

var errLayout = errors.New("unexpected iso9660 layout")

// dirRecord is a directory record found in an image.
type dirRecord struct {
	off    int // offset of the record in the image
	ident  []byte
	flags  byte
	extent uint32
	size   uint32
}

func (r dirRecord) isDir() bool { return r.flags&dirFlag != 0 }

// isSelfOrParent reports the "." and ".." records (identifiers 0x00, 0x01).
func (r dirRecord) isSelfOrParent() bool {
	return len(r.ident) == 1 && r.ident[0] <= 1
}

// readDir returns the records of the directory whose extent is given.
func readDir(img []byte, extent, size uint32) ([]dirRecord, error) {
	start := int64(extent) * sectorSize
	end := start + int64(size)
	if size%sectorSize != 0 || end > int64(len(img)) || start < (pvdSector+2)*sectorSize {
		return nil, fmt.Errorf("%w: directory extent %d+%d", errLayout, extent, size)
	}
	var recs []dirRecord
	for sec := int(start); sec < int(end); sec += sectorSize {
		for off := sec; off < sec+sectorSize; {
			n := int(img[off])
			if n == 0 {
				break // the rest of the sector is padding
			}
			if n < recordMinLength || off+n > sec+sectorSize || 33+int(img[off+32]) > n {
				return nil, fmt.Errorf("%w: directory record at %d", errLayout, off)
			}
			recs = append(recs, dirRecord{
				off:    off,
				ident:  img[off+33 : off+33+int(img[off+32])],
				flags:  img[off+25],
				extent: binary.LittleEndian.Uint32(img[off+2:]),
				size:   binary.LittleEndian.Uint32(img[off+10:]),
			})
			off += n
		}
	}
	return recs, nil
}

// normalize makes an image from kdomanski/iso9660 deterministic and adds
// path tables; see the comment above. It returns a new slice.
func normalize(img []byte) ([]byte, error) {
	if len(img) < (pvdSector+3)*sectorSize || len(img)%sectorSize != 0 {
		return nil, fmt.Errorf("%w: %d bytes", errLayout, len(img))
	}
	pvd := img[pvdSector*sectorSize : (pvdSector+1)*sectorSize]
	term := img[(pvdSector+1)*sectorSize:]
	switch {
	case pvd[0] != 1 || string(pvd[1:6]) != "CD001":
		return nil, fmt.Errorf("%w: no primary volume descriptor at sector 16", errLayout)
	case term[0] != 255 || string(term[1:6]) != "CD001":
		return nil, fmt.Errorf("%w: no terminator at sector 17", errLayout)
	case int(binary.LittleEndian.Uint32(pvd[pvdVolumeSize:]))*sectorSize != len(img):
		return nil, fmt.Errorf("%w: volume size does not match the image", errLayout)
	case binary.LittleEndian.Uint32(pvd[pvdPathTabSize:]) != 0:
		return nil, fmt.Errorf("%w: a path table is already there", errLayout)
	}

	copy(pvd[pvdSystemID:pvdSystemID+32], padSpaces("LINUX", 32))
	copy(pvd[pvdCreated:], volumeDate(isoEpoch))
	copy(pvd[pvdModified:], volumeDate(isoEpoch))
	copy(pvd[pvdExpires:], volumeDate(time.Time{}))
	copy(pvd[pvdEffective:], volumeDate(time.Time{}))
	recDate := recordDate(isoEpoch)
	copy(pvd[pvdRootRecord+recordDateOff:], recDate)

	// Walk the tree breadth first, stamping every record; the queue is also
	// the path table's order (ECMA-119 9.4: by level, then parent number,
	// then identifier, which is the order of records in a directory).
	type dir struct {
		extent, size uint32
		parent       uint16 // 1-based number of the parent in the queue
		ident        []byte
	}
	root := pvd[pvdRootRecord:]
	queue := []dir{{
		extent: binary.LittleEndian.Uint32(root[2:]),
		size:   binary.LittleEndian.Uint32(root[10:]),
		parent: 1,
		ident:  []byte{0},
	}}
	seen := map[uint32]bool{queue[0].extent: true}
	for i := 0; i < len(queue); i++ {
		recs, err := readDir(img, queue[i].extent, queue[i].size)
		if err != nil {
			return nil, err
		}
		for _, r := range recs {
			copy(img[r.off+recordDateOff:], recDate)
			if !r.isDir() || r.isSelfOrParent() {
				continue
			}
			if seen[r.extent] || len(queue) >= 0xffff {
				return nil, fmt.Errorf("%w: directory loop or too many directories", errLayout)
			}
			seen[r.extent] = true
			queue = append(queue, dir{r.extent, r.size, uint16(i + 1), r.ident})
		}
	}

	var lTable, mTable []byte
	for _, d := range queue {
		e := make([]byte, 8+len(d.ident)+len(d.ident)%2)
		e[0] = byte(len(d.ident))
		copy(e[8:], d.ident)
		m := append([]byte(nil), e...)
		binary.LittleEndian.PutUint32(e[2:], d.extent)
		binary.LittleEndian.PutUint16(e[6:], d.parent)
		binary.BigEndian.PutUint32(m[2:], d.extent)
		binary.BigEndian.PutUint16(m[6:], d.parent)
		lTable = append(lTable, e...)
		mTable = append(mTable, m...)
	}
	tableSectors := (len(lTable) + sectorSize - 1) / sectorSize
	lLoc := len(img) / sectorSize
	mLoc := lLoc + tableSectors
	out := make([]byte, len(img)+2*tableSectors*sectorSize)
	copy(out, img)
	copy(out[lLoc*sectorSize:], lTable)
	copy(out[mLoc*sectorSize:], mTable)

	pvd = out[pvdSector*sectorSize:]
	putBothEndian32(pvd[pvdVolumeSize:], uint32(len(out)/sectorSize))
	putBothEndian32(pvd[pvdPathTabSize:], uint32(len(lTable)))
	binary.LittleEndian.PutUint32(pvd[pvdPathTabL:], uint32(lLoc))
	binary.LittleEndian.PutUint32(pvd[pvdPathTabOptL:], 0)
	binary.BigEndian.PutUint32(pvd[pvdPathTabM:], uint32(mLoc))
	binary.BigEndian.PutUint32(pvd[pvdPathTabOptM:], 0)
	return out, nil
}

func putBothEndian32(b []byte, v uint32) {
	binary.LittleEndian.PutUint32(b[0:4], v)
	binary.BigEndian.PutUint32(b[4:8], v)
}

func padSpaces(s string, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = ' '
	}
	copy(b, s)
	return b
}

// volumeDate encodes t as ECMA-119 8.4.26.1 dec-datetime in UTC; the zero
// time gives "not specified" (sixteen '0' digits and a zero offset).
func volumeDate(t time.Time) []byte {
	if t.IsZero() {
		return append([]byte("0000000000000000"), 0)
	}
	t = t.UTC()
	s := fmt.Sprintf("%04d%02d%02d%02d%02d%02d%02d", t.Year(), t.Month(), t.Day(),
		t.Hour(), t.Minute(), t.Second(), t.Nanosecond()/1e7)
	return append([]byte(s), 0)
}

// recordDate encodes t as an ECMA-119 9.1.5 directory record date in UTC.
func recordDate(t time.Time) []byte {
	t = t.UTC()
	return []byte{byte(t.Year() - 1900), byte(t.Month()), byte(t.Day()),
		byte(t.Hour()), byte(t.Minute()), byte(t.Second()), 0}
}
